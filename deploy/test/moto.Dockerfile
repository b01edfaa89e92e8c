# moto_server as the S3 endpoint in place of MinIO (minio/minio cannot be pulled here).
ARG BASE_IMAGE=local/debian-python:bookworm
FROM ${BASE_IMAGE}
RUN python3 -m venv /opt/moto && /opt/moto/bin/pip install -q --no-cache-dir "moto[server]>=5"
ENTRYPOINT ["/opt/moto/bin/moto_server"]
