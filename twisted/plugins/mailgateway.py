"""twistd plugin: names the real module as a string so that nothing is imported until it runs."""

from twisted.application.service import ServiceMaker

mailgateway = ServiceMaker(
    "mailgateway",
    "gateway.tap",
    "Secure mail access gateway: TLS front end for IMAP, POP3 and submission in front of a plaintext store, "
    "with a web side (autoconfiguration, webmail proxy).",
    "mailgateway",
)
