#!/bin/sh
# The HAProxy that Ray Serve starts for recserve: `recserve serve` points RAY_SERVE_HAPROXY_BINARY_PATH here and
# RECSERVE_HAPROXY_REAL_BINARY at the real binary (pipeline/commands/serve.py).
#
# It adds to the `defaults` section of the config Ray generated `option http-buffer-request`, a deadline for the
# whole request ($RECSERVE_HAPROXY_REQUEST_TIMEOUT_S, 5 s) and its 408 answer in the service's one error shape, then
# runs the real HAProxy with Ray's arguments unchanged (same pid, so Ray's reloads, -sf and -x work as before).
# Why: HAProxy can replay a request on another replica (retry-on ... empty-response) only if the whole request had
# arrived when it first sent it to a replica; otherwise it drops that request's L7 retry. A client that writes a
# POST's headers and body separately (httpx does) often has its headers forwarded at once over a reused server
# connection, before the body arrives: if that replica dies then, HAProxy closes the client connection with no
# answer (or answers 502, which Ray's errorfile turns into 500). With the option HAProxy waits for the body (up to
# its 16 KB buffer) before choosing a replica, so such a request is replayed. Ray 2.60 does not expose the option.
# It also stamps every request with `X-Request-Start: t=<µs since the epoch>` in Ray's `http_frontend`: the ingress
# starts its latency clock there (pipeline/edge/timing.py), so the recorded latency holds the wait behind HAProxy.
# The deadline: with the body buffered here, a caller that never finishes its body would otherwise hold a connection
# for Ray's `timeout client` (an hour); the app's own 408 (body_timeout_s) then only guards a replica's own port.
set -eu
real=${RECSERVE_HAPROXY_REAL_BINARY:?RECSERVE_HAPROXY_REAL_BINARY is not set}
timeout=${RECSERVE_HAPROXY_REQUEST_TIMEOUT_S:-5}
cfg=
prev=
for arg in "$@"; do
    if [ "$prev" = "-f" ]; then cfg=$arg; fi
    prev=$arg
done
if [ -n "$cfg" ] && ! grep -qx '    option http-buffer-request' "$cfg"; then
    if ! grep -qx 'defaults' "$cfg"; then
        echo "recserve: $cfg has no 'defaults' section to add 'option http-buffer-request' to" >&2
        exit 1
    fi
    if ! grep -qx 'frontend http_frontend' "$cfg"; then
        echo "recserve: $cfg has no 'frontend http_frontend' section to add the X-Request-Start stamp to" >&2
        exit 1
    fi
    added=$(mktemp)
    cat > "$added" <<CFG
    option http-buffer-request
    timeout http-request ${timeout}s
    unique-id-format %[uuid]
    http-error status 408 content-type application/json lf-string "{\\"request_id\\":\\"%[unique-id]\\",\\"error\\":\\"the request did not arrive within ${timeout} s: send the whole request at once, then retry\\",\\"field\\":\\"body\\"}" hdr X-Request-ID "%[unique-id]"
CFG
    sed -i "/^defaults\$/r $added" "$cfg"
    # HAProxy's clock when the request (whole, as buffered above) reached its frontend, replacing any client value.
    sed -i '/^frontend http_frontend$/a\    http-request set-header X-Request-Start t=%[date(0,us)]' "$cfg"
    rm -f "$added"
fi
exec "$real" "$@"
