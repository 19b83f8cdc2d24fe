#!/usr/bin/env bash
# Make the federation's TLS material and SuperNode authentication keys.
#
#   deploy/make-certs.sh OUT_DIR SUPERLINK_SAN [SITE ...]
#
# OUT_DIR/ca.crt, ca.key          the federation's CA (keep ca.key offline); a real CA
#                                 certificate: basicConstraints critical CA:TRUE, keyUsage
#                                 keyCertSign + cRLSign
# OUT_DIR/superlink.crt, .key     the SuperLink's certificate; SUPERLINK_SAN is an OpenSSL
#                                 subjectAltName list covering the address sites dial,
#                                 e.g. "IP:10.0.0.5,DNS:fl.example.org". IP:127.0.0.1 and
#                                 DNS:localhost are always added: the SuperLink listens on
#                                 loopback behind m2diff-server's TLS front, which (like the
#                                 coordinator's own flwr CLI) dials it by those names.
# OUT_DIR/sites/SITE.key, .key.pub  one ECDSA P-384 key pair per site (SuperNode auth);
#                                 the private key goes to the site only, the .pub is
#                                 registered by the coordinator: flwr supernode register SITE.key.pub CONN
# Everything is created with umask 077 (private keys 0600, folders 0700: not listable by
# other users); the public files (ca.crt, superlink.crt, *.pub) are made 0644 afterwards.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 OUT_DIR SUPERLINK_SAN [SITE ...]" >&2; exit 2; }
umask 077
out=$1; san=$2; shift 2
for name in IP:127.0.0.1 DNS:localhost; do
  case ",$san," in *",$name,"*) ;; *) san="$san,$name" ;; esac
done
mkdir -p "$out/sites"
if [ ! -f "$out/ca.crt" ]; then
  openssl req -x509 -newkey rsa:4096 -sha256 -days 3650 -nodes \
    -keyout "$out/ca.key" -out "$out/ca.crt" -subj "/CN=m2diff-fl federation CA" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -addext "subjectKeyIdentifier=hash" 2>/dev/null
fi
openssl req -newkey rsa:4096 -sha256 -nodes -keyout "$out/superlink.key" \
  -out "$out/superlink.csr" -subj "/CN=m2diff-fl superlink" 2>/dev/null
printf 'subjectAltName=%s\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nauthorityKeyIdentifier=keyid\n' "$san" > "$out/superlink.ext"
openssl x509 -req -in "$out/superlink.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" \
  -CAcreateserial -out "$out/superlink.crt" -days 825 -sha256 -extfile "$out/superlink.ext" 2>/dev/null
rm -f "$out/superlink.csr" "$out/superlink.ext"
for site in "$@"; do
  [ -f "$out/sites/$site.key" ] || ssh-keygen -q -t ecdsa -b 384 -N "" -C "$site" -f "$out/sites/$site.key"
done
chmod 644 "$out/ca.crt" "$out/superlink.crt" "$out"/sites/*.pub 2>/dev/null || true
echo "wrote $out: ca.crt superlink.crt (SANs $san) superlink.key${*:+ and keys for: $*}"
