#!/usr/bin/env bash
# Renders the demo config into a private ServerRoot and runs Apache in the foreground.
set -euo pipefail
so=$1 root=$2 port=$3
here=$(cd "$(dirname "$0")/.." && pwd)
rm -rf "$root"
mkdir -p "$root"/{conf,run,htdocs,examples}
chmod 0755 "$root" "$root"/{conf,run,htdocs,examples}
cp "$here"/examples/*.wsgi "$root/examples/"
chmod 0644 "$root"/examples/*.wsgi
if_root='#'; [ "$(id -u)" = 0 ] && if_root=''
sed -e "s|@ROOT@|$root|g" -e "s|@PORT@|$port|g" -e "s|@MODULE_SO@|$so|g" -e "s|@IF_ROOT@|$if_root|g" \
    "$here/demo/httpd.conf.in" > "$root/conf/httpd.conf"
/usr/sbin/apache2 -t -f "$root/conf/httpd.conf"
cat <<MSG

mod_wsgi_rs demo on http://127.0.0.1:$port/ (Ctrl-C stops it; config: $root/conf/httpd.conf)
  curl http://127.0.0.1:$port/hello          # global group 'demo'
  curl http://127.0.0.1:$port/whoami/x/y     # which process, user and group served it
MSG
[ -z "$if_root" ] && echo "  curl http://127.0.0.1:$port/bob            # per-user group 'bob', running as bob"
echo
exec /usr/sbin/apache2 -DFOREGROUND -f "$root/conf/httpd.conf"
