"""Outbound delivery: the SMTP client, MX resolution and the delivery attempt.

`queue/` keeps the records, the schedule and the reports; it asks this
package to deliver. This package imports nothing from `queue/`.
"""
