# sandboxer-prometheus:dev: Debian's Prometheus (its only shared libraries,
# libc and the dynamic loader, copied beside it) FROM scratch, scraping
# every service of the compose cluster with deploy/prometheus's
# configuration and alert rules. Built by `make cluster-up` from
# deploy/compose/build/prometheus/.
FROM scratch
ARG UID=65532
ARG GID=65532
COPY lib/ /lib/
COPY lib64/ /lib64/
COPY prometheus /prometheus-bin
COPY --chown=${UID}:${GID} empty/ /prometheus/
USER ${UID}:${GID}
EXPOSE 9090
ENTRYPOINT ["/prometheus-bin"]
LABEL org.sand-boxer.image="prometheus"
