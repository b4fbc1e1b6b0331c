# The release binary with GStreamer, for pipelines/kubernetes/. Not built by CI (it has no Docker
# daemon); its build steps are the README's set-up command.
#   docker build -t vtr-index .
FROM debian:bookworm AS build
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends ca-certificates curl build-essential \
    && curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
ENV PATH=/root/.cargo/bin:$PATH
WORKDIR /src
COPY . .
RUN bash scripts/setup-system.sh && cargo build --release --locked

FROM debian:bookworm
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends gstreamer1.0-plugins-base \
    gstreamer1.0-plugins-good gstreamer1.0-plugins-bad gstreamer1.0-plugins-ugly gstreamer1.0-libav \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/vtr-index /usr/local/bin/vtr-index
ENTRYPOINT []
CMD ["vtr-index", "--help"]
