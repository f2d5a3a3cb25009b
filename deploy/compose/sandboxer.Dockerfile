# sandboxer:dev: the one binary, static (CGO_ENABLED=0), FROM scratch. No
# shell, no package manager, nothing but the binary and its data directory.
# The compose cluster runs every service and setup from it; so does
# deploy/kubernetes. Built by `make cluster-up` from deploy/compose/build/sandboxer/.
FROM scratch
# The owner of the data directory, which a fresh named volume copies: the
# compose cluster runs as the user who runs make (UID, GID build args);
# 65532 otherwise, as the Kubernetes manifests run it.
ARG UID=65532
ARG GID=65532
COPY sandboxer /sandboxer
COPY --chown=${UID}:${GID} empty/ /var/lib/sandboxer/
ENV HOME=/var/lib/sandboxer SANDBOXER_DATA_DIR=/var/lib/sandboxer
USER ${UID}:${GID}
ENTRYPOINT ["/sandboxer"]
LABEL org.sand-boxer.image="sandboxer"
