"""The gevent shell: sockets, timeouts, and the services the core's events call for."""
