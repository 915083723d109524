# The project installed into an Airflow 3 image: every Airflow component and the GPU pods run it.
FROM python:3.11-slim-bookworm

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    AIRFLOW_HOME=/opt/airflow \
    LAION_CONFIG=/opt/airflow/laion.yaml

RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential libpq-dev curl \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/laion
COPY pyproject.toml README.md ./
COPY laion_tasks ./laion_tasks
# the airflow extra includes the Celery provider with Redis (the compose stack's executor)
RUN pip install --upgrade pip \
 && pip install '.[airflow]'

COPY dags /opt/airflow/dags
COPY plugins /opt/airflow/plugins
COPY deploy/laion.yaml /opt/airflow/laion.yaml

RUN useradd --create-home --uid 50000 airflow && mkdir -p /opt/airflow/logs && chown -R airflow /opt/airflow
USER airflow
WORKDIR /opt/airflow
