"""mailgateway: a TLS front end for IMAP, POP3 and submission in front of a plaintext mail store."""
