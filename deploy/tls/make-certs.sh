#!/usr/bin/env bash
# Make a private CA, a coordinator (server) certificate and client certificates for
# mutual TLS, with openssl.
#
#   deploy/tls/make-certs.sh OUT_DIR [--host NAME]... [--ip ADDR]... [--client NAME]... [--days N]
#
# Defaults: --host localhost --ip 127.0.0.1, no client certificates, 825 days.
# Writes OUT_DIR/ca.{crt,key}, OUT_DIR/server.{crt,key}, OUT_DIR/clients/NAME.{crt,key}.
# An existing CA in OUT_DIR is reused (so more clients can be added later); keys are
# created with mode 600. Nothing is overwritten: an existing server or client
# certificate of the same name is an error.
set -euo pipefail

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }
[ $# -ge 1 ] || usage
case "$1" in -h|--help) usage 0 ;; esac
out=$1; shift
hosts=(); ips=(); clients=(); days=825
while [ $# -gt 0 ]; do
  case "$1" in
    --host) hosts+=("$2"); shift 2 ;;
    --ip) ips+=("$2"); shift 2 ;;
    --client) clients+=("$2"); shift 2 ;;
    --days) days=$2; shift 2 ;;
    -h|--help) usage 0 ;;
    *) echo "make-certs.sh: unknown argument '$1'" >&2; usage ;;
  esac
done
[ ${#hosts[@]} -gt 0 ] || hosts=(localhost)
[ ${#ips[@]} -gt 0 ] || ips=(127.0.0.1)
command -v openssl >/dev/null || { echo "make-certs.sh: openssl not found" >&2; exit 1; }
case "$days" in ''|*[!0-9]*) echo "make-certs.sh: --days must be a positive integer, got '$days'" >&2; exit 2 ;; esac

mkdir -p "$out/clients"
umask 077
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT

if [ ! -f "$out/ca.crt" ]; then
  openssl req -x509 -newkey rsa:3072 -sha256 -nodes -days "$days" \
    -keyout "$out/ca.key" -out "$out/ca.crt" -subj "/CN=fedmla CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
  chmod 644 "$out/ca.crt"
  echo "CA:      $out/ca.crt"
fi

sign() {  # sign NAME CN EXT_FILE -> $out/NAME.{crt,key}
  local name=$1 cn=$2 ext=$3
  if [ -e "$out/$name.crt" ]; then echo "make-certs.sh: $out/$name.crt exists; not overwriting" >&2; exit 1; fi
  openssl req -newkey rsa:2048 -sha256 -nodes -keyout "$out/$name.key" -out "$tmp/req.csr" -subj "/CN=$cn" 2>/dev/null
  openssl x509 -req -in "$tmp/req.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial \
    -days "$days" -sha256 -extfile "$ext" -out "$out/$name.crt" 2>/dev/null
  chmod 644 "$out/$name.crt"
}

if [ ! -e "$out/server.crt" ]; then
  san=""
  for h in "${hosts[@]}"; do san+="${san:+,}DNS:$h"; done
  for i in "${ips[@]}"; do san+="${san:+,}IP:$i"; done
  printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=%s\n' "$san" > "$tmp/server.ext"
  sign server "${hosts[0]}" "$tmp/server.ext"
  echo "server:  $out/server.crt ($san)"
fi

printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n' > "$tmp/client.ext"
for c in "${clients[@]}"; do
  case "$c" in */*|'') echo "make-certs.sh: bad client name '$c'" >&2; exit 2 ;; esac
  sign "clients/$c" "$c" "$tmp/client.ext"
  echo "client:  $out/clients/$c.crt"
done
