"""The outbound queue: records, retry schedule, delivery, bounces."""
