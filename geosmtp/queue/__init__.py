"""The outbound relay: retry schedule, MX resolution, SMTP delivery attempts, the queue."""
