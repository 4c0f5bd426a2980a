# pacsnode image (CPU). Later issues add a GPU stage.
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /opt/pacsnode
COPY pyproject.toml constraints.txt README.md ./
COPY pacsnode ./pacsnode
COPY scp ./scp
COPY workers ./workers
COPY models ./models
COPY db ./db
RUN pip install --no-cache-dir -c constraints.txt . \
 && useradd --system --uid 1000 --home-dir /var/lib/pacsnode --create-home pacsnode
USER pacsnode
ENV PACSNODE_DATA_DIR=/var/lib/pacsnode
EXPOSE 11112
HEALTHCHECK --interval=30s --timeout=10s CMD python -c "import socket; socket.create_connection(('127.0.0.1', 11112), 5)"
CMD ["pacsnode", "serve"]
