"""
Runs fail2ban's own filter code over the gateway's log lines as its journal backend
(C{backend = systemd}, the shipped jail's) hands them over, and prints the addresses found as
JSON. Run by the system's python3, which has the fail2ban package: C{fail2ban_journal.py
CONFIG_DIR < lines.json}, where CONFIG_DIR holds filter.d/mailgateway.conf.
"""
import json
import sys
import time

from fail2ban.client.filterreader import FilterReader
from fail2ban.server.filter import Filter

reader = FilterReader("mailgateway", "mailgateway", {}, share_config={}, basedir=sys.argv[1])
reader.read()
reader.getOptions({})
fail2ban_filter = Filter(None)
for regex in reader.getCombined()["failregex"].splitlines():
    if regex.strip():
        fail2ban_filter.addFailRegex(regex)
fail2ban_filter.checkFindTime = False
found = []
now = time.time()
for message in json.load(sys.stdin):
    # FilterSystemd.formatJournalEntry: "HOST IDENTIFIER[PID]: MESSAGE", with the journal's own date apart.
    entry = ("", time.strftime("%Y-%m-%d %H:%M:%S ", time.localtime(now)), "mail.example.org twistd[1234]: " + message)
    found += [str(match[1]) for match in fail2ban_filter.processLine(entry, now)]
print(json.dumps(found))
