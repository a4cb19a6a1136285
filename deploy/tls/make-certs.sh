#!/bin/sh
# An example certificate authority for NATS with client certificates, made with openssl:
#   deploy/tls/make-certs.sh DIR [SERVER_SAN] [CLIENT_NAME...]
# writes into DIR (created, mode 700):
#   ca.pem ca.key                  the CA (keep ca.key off the servers: it signs new certs)
#   server.pem server.key          the nats-server's, for SERVER_SAN
#                                  (default IP:127.0.0.1,DNS:localhost)
#   <client>.pem <client>.key      one per CLIENT_NAME (default: volumed)
# Private keys stay in DIR: never commit them. Production sites use their own PKI; this
# shows the shape nats-server's tls { verify: true } expects (docs/operations.md).
set -eu
dir=${1:?usage: make-certs.sh DIR [SERVER_SAN] [CLIENT_NAME...]}
san=${2:-IP:127.0.0.1,DNS:localhost}
[ $# -gt 2 ] && shift 2 || set -- volumed
days=${VOLUMED_CERT_DAYS:-365}
umask 077
mkdir -p "$dir"
cd "$dir"
openssl req -x509 -newkey rsa:2048 -nodes -days "$days" -subj /CN=volumed-nats-ca \
    -keyout ca.key -out ca.pem 2>/dev/null
printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth\n' "$san" > server.ext
printf 'extendedKeyUsage=clientAuth\n' > client.ext
sign() { # name subject extfile
    openssl req -newkey rsa:2048 -nodes -subj "$2" -keyout "$1.key" -out "$1.csr" 2>/dev/null
    openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days "$days" \
        -extfile "$3" -out "$1.pem" 2>/dev/null
    rm -f "$1.csr"
}
sign server "/CN=${san#*:}" server.ext
for client in "$@"; do
    sign "$client" "/CN=$client" client.ext
done
rm -f server.ext client.ext ca.srl
echo "certificates in $dir: ca.pem, server.pem/.key, $* (.pem/.key)"
