"""The write path: writes as named, versioned commands; the dispatcher that applies
them now or queues them durably; the apply step the worker shares."""
