-- One server, two databases: Airflow's metadata and the pipeline's lineage.
CREATE DATABASE airflow;
CREATE DATABASE lineage;
