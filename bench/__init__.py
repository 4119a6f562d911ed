"""geosmtp's bench suite: a gevent load generator, named scenarios, side-by-side runs.

See bench/README.md. Nothing here is imported by geosmtp itself.
"""
