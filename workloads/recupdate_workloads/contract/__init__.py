"""The contract between the controller and the workloads, written once (docs/architecture.md).

Both sides import these modules; they import only the standard library and pydantic, so the operator (no
torch, no Ray) and the workloads (no kopf, no kubernetes) can share them:

- ``env``         environment variables both sides read (the store DSN)
- ``entrypoints`` the job entrypoint modules and their command line
- ``serve``       the typed Serve ``user_config`` and the Serve application config (KubeRay's serveConfigV2)
- ``durations``   the duration grammar of the policy spec and the job configs
- ``labels``      labels and annotations on policies and their children
- ``timefmt``     how times are written and read (RFC 3339, UTC)
- ``registry``    the default store schema of a policy, and the activation transaction on ``releases``
- ``redact``      the one redaction of secrets (DSN passwords) for every message that leaves a process
- ``secret_file`` secrets handed to other processes in private files, never through logged settings
"""
