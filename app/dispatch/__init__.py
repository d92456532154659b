"""The reference service's writes: the notification commands (notifications.py)."""
