"""Entry point of the scheduled deployment: the nightly batch from a manifest URI.

A deployment entry point (see `deployments/prefect.yaml`); the flow itself lives in the
package, `prefect_nanobanana/flows/`.
"""

from prefect_nanobanana.flows import batch_edit

__all__ = ["batch_edit"]

if __name__ == "__main__":
    import asyncio
    import sys

    print(asyncio.run(batch_edit(manifest_uri=sys.argv[1], archive_uri=sys.argv[2])))
