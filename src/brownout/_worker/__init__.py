"""The worker's machinery: batched delivery, the health gate, the adaptive drain, the apply and email actors, the outbox relay."""
