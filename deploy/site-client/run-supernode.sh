#!/bin/sh
# Start this site's Flower SuperNode; one launch line for systemd (megaportrait-supernode.service) and containers.
# Required: MEGAPORTRAIT_SITE_ID, MEGAPORTRAIT_SUPERLINK (host:port). Optional: MEGAPORTRAIT_PKI_DIR (ca.pem and
# node-auth.key; systemd passes its credentials directory), MEGAPORTRAIT_SITE_DIR (photos/ and federation/),
# MEGAPORTRAIT_SUPERNODE_API (host:port of the SuperNode's local API), MEGAPORTRAIT_SUPERNODE_HEALTH (gRPC health).
set -eu
: "${MEGAPORTRAIT_SITE_ID:?set MEGAPORTRAIT_SITE_ID to this site id (as issued by megaportrait pki init)}"
: "${MEGAPORTRAIT_SUPERLINK:?set MEGAPORTRAIT_SUPERLINK to the coordinator host:port}"
pki=${MEGAPORTRAIT_PKI_DIR:-/etc/megaportrait/pki/site}
site=${MEGAPORTRAIT_SITE_DIR:-/var/lib/megaportrait/site}
api=${MEGAPORTRAIT_SUPERNODE_API:-127.0.0.1:9094}
mkdir -p "$site/photos" "$site/federation"
exec flower-supernode \
  --superlink "$MEGAPORTRAIT_SUPERLINK" \
  --root-certificates "$pki/ca.pem" \
  --auth-supernode-private-key "$pki/node-auth.key" \
  --node-config "site-id=\"$MEGAPORTRAIT_SITE_ID\" data-dir=\"$site/photos\" state-dir=\"$site/federation\"" \
  --isolation subprocess \
  --host "${api%:*}" \
  --port "${api##*:}" \
  --health-server-address "${MEGAPORTRAIT_SUPERNODE_HEALTH:-127.0.0.1:9099}"
