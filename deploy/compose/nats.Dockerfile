# sandboxer-nats:dev: nats-server, static (CGO_ENABLED=0, built from the Go
# module sand-boxer requires), FROM scratch, with Debian's static busybox
# for the health check's wget alone. Built by `make cluster-up` from
# deploy/compose/build/nats/.
FROM scratch
# The owner of /data (JetStream's store and the account resolver's JWTs),
# which a fresh named volume copies: the user who runs make.
ARG UID=65532
ARG GID=65532
COPY nats-server /nats-server
COPY busybox /bin/busybox
COPY --chown=${UID}:${GID} empty/ /data/
USER ${UID}:${GID}
EXPOSE 4222 6222 8222
ENTRYPOINT ["/nats-server"]
CMD ["--config", "/etc/nats/nats.conf"]
LABEL org.sand-boxer.image="nats"
