# Triage gateway image. Build: docker build -t triage:0.1.0 .
# Run the demo (simulated GPU pools in-process): docker run --rm -p 8080:8080 triage:0.1.0
# In Kubernetes the chart (charts/triage) mounts the real policy over /etc/triage.

# --- build: install the package and its dependencies into a virtualenv --------------------
FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python -m venv /opt/triage
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY classifiers ./classifiers
# A plain (non-editable) install: gateway, classifiers and the classifier model files, which are
# package data. Every dependency ships wheels, so no compiler is needed; none reaches the image.
RUN /opt/triage/bin/pip install .

# --- runtime: the virtualenv and nothing else -----------------------------------------------
FROM python:3.11-slim

RUN groupadd --system --gid 10001 triage \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin triage

COPY --from=build /opt/triage /opt/triage
COPY policies/demo.yaml /etc/triage/policy.yaml

# Bytecode was compiled at install; the chart's root filesystem is read-only and /tmp (an
# emptyDir there) is the one writable place, so it is HOME and the working directory too.
ENV PATH=/opt/triage/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp

WORKDIR /tmp
USER 10001:10001
EXPOSE 8080

ENTRYPOINT ["triage"]
CMD ["serve", "--policy", "/etc/triage/policy.yaml", "--host", "0.0.0.0", "--port", "8080"]
