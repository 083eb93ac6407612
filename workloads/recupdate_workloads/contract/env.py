"""Environment variables read by both the controller and the workloads."""

#: The store DSN: jobs, Serve replicas and the operator (for policies without spec.store.secretRef) read it.
DSN_ENV = "RECUPDATE_STORE_DSN"

#: The DSN of the user's own PostgreSQL, for data sources named `sql` (spec.data.sql.dsnSecretRef).
SOURCE_DSN_ENV = "RECUPDATE_SOURCE_DSN"

#: The variables of object-storage credentials (spec.data.objectStorage.credentialsSecret holds them under these
#: keys); pyarrow's S3 filesystem reads them from the environment. The session token is optional.
S3_CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")

#: "off": a job does not sync its data sources before counting (local mode, which feeds the store itself).
SYNC_ENV = "RECUPDATE_SYNC"
