# Sourced by scripts/demo.sh and scripts/test.sh: installs what the gateway and its tests need
# on a fresh Debian machine, then the gateway itself into .venv (a regular, non-editable install).
set -euo pipefail

packages=(dovecot-imapd dovecot-pop3d dovecot-submissiond postfix libsasl2-modules curl openssl ca-certificates
          fetchmail isync swaks libnet-ssleay-perl fail2ban haproxy systemd)
python3 -c 'import ensurepip' 2>/dev/null || packages+=(python3-venv)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  echo "setup: installing ${missing[*]}" >&2
  # Postfix without a system configuration: the tests run private instances only.
  echo "postfix postfix/main_mailer_type select No configuration" | $sudo debconf-set-selections
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Only the binaries are needed: the demo and the tests run private instances. Do not leave
  # system-wide services that the packages start (Dovecot would listen on 143/993, HAProxy
  # would run its own configuration).
  if [ -d /run/systemd/system ]; then
    for service in dovecot postfix fail2ban haproxy; do
      if [[ " ${missing[*]} " == *" $service "* || " ${missing[*]} " == *" $service-imapd "* ]]; then
        echo "setup: stopping and disabling the system $service.service the package started" >&2
        $sudo systemctl disable --now "$service.service" >/dev/null 2>&1 || true
      fi
    done
  fi
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q . "$@"
# Twisted caches plugin lists; write the cache now, as the installing user, not at first start.
.venv/bin/python -c 'from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))'
