"""What makes a fleet of processes act as one: the shared breaker."""
