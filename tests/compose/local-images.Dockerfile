# Local stand-ins for the public images docker-compose.yml names (redis, nginx), built by
# scripts/compose-test.sh from Debian's packages on a Debian rootfs it made with
# debootstrap, for machines that reach no image registry. Each behaves as the public
# image does for docker-compose.yml: same commands, same health checks.
ARG BASE

FROM ${BASE} AS debian
# Installing a package must not try to start its service inside an image build.
RUN printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d

FROM debian AS redis
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server \
 && rm -rf /var/lib/apt/lists/*
# The public redis image is built with protected mode off, so containers on the same
# network can connect without a password; Debian's redis-server keeps it on unless told.
RUN printf '#!/bin/sh\nexec /usr/bin/redis-server "$@" --protected-mode no\n' > /usr/local/bin/redis-server \
 && chmod +x /usr/local/bin/redis-server
USER redis
WORKDIR /var/lib/redis
EXPOSE 6379
CMD ["redis-server"]

FROM debian AS nginx
# wget: docker-compose.yml's health check for nginx uses it, as the alpine image has it.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nginx wget \
 && rm -rf /var/lib/apt/lists/* \
 && ln -sf /dev/stdout /var/log/nginx/access.log \
 && ln -sf /dev/stderr /var/log/nginx/error.log
EXPOSE 80
STOPSIGNAL SIGQUIT
CMD ["nginx", "-g", "daemon off;"]
