"""Support code for tests and demos: a throwaway PKI and a private, plaintext Dovecot sandbox.

Nothing here is meant for production use; it lives in the package (like
``twisted.internet.testing``) so that both the test suite and the README's demo
command can import it.
"""
