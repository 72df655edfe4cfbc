# meterdrop in a container: SFTP on 22, explicit FTPS on 21, passive data ports 8192-8200.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    METERDROP_DATA_DIR=/data \
    METERDROP_CERTS_DIR=/certs

WORKDIR /app
COPY pyproject.toml README.md ./
COPY meterdrop ./meterdrop
COPY processor ./processor
COPY fileserver ./fileserver
RUN pip install . && mkdir -p /data /certs

VOLUME ["/data", "/certs"]
EXPOSE 22 21 8192-8200

# Binding ports below 1024 needs root in the container (or CAP_NET_BIND_SERVICE).
# The address announced in PASV replies comes from METERDROP_PUBLIC_HOST (compose.yaml requires it).
ENTRYPOINT ["meterdrop"]
CMD ["serve", "--host", "0.0.0.0", "--sftp-port", "22", "--ftps-port", "21", "--passive-ports", "8192-8200"]
