# Kills its own daemon process without a response: the group must be restarted.
import os


def application(environ, start_response):
    os._exit(3)
