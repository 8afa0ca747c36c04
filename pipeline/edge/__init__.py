"""The HTTP edge: routes, request and response bodies, the one error shape and the one status mapping. It only
translates between HTTP and the chain (chain/)."""
