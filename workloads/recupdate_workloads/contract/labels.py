"""Names of the API group, and the labels and annotations on policies and on the children the operator owns."""

GROUP = "recupdate.io"

# Annotations a person sets on a policy; the operator acts on each value once.
ANNOTATION_APPROVE = f"{GROUP}/approve"  # =<release_id>: promote that candidate (promotion: Manual)
ANNOTATION_ROLLBACK = f"{GROUP}/rollback-to"  # =<release_id>: re-activate that earlier release
# Labels the operator puts on its children (RayJobs, the RayService); jobs find their policy and run by them.
LABEL_POLICY = f"{GROUP}/policy"
LABEL_KIND = f"{GROUP}/kind"
LABEL_RUN_ID = f"{GROUP}/run-id"
LABEL_GENERATION = f"{GROUP}/generation"
