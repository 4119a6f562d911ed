"""geosmtp: an SMTP mail server in Python (sans-I/O core, gevent shell, Maildir)."""

__version__ = "0.1.0"
