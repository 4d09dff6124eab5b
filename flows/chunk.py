"""Entry point of the `chunk` deployment: one chunk of a scaled-out batch, a child run.

A deployment entry point (see `deployments/prefect.yaml`); the flow itself lives in the
package, `prefect_nanobanana/flows/`.

A batch run given `chunk_size` and `chunk_deployment="nano-banana-batch/chunk"` splits
its rows and runs each chunk through this deployment, so the chunks spread over the
workers of its pool. It is the same flow as the nightly batch; only its parameters
(the chunk's rows, the parent's options) come from the parent run.
"""

from prefect_nanobanana.flows import batch_edit

__all__ = ["batch_edit"]
