"""Entry point of the `incoming-folder` deployment: every image that landed in a folder or
S3 prefix, edited once.

A deployment entry point (see `deployments/prefect.yaml`); the flow itself lives in the
package, `prefect_nanobanana/flows/`. Scheduled hourly over `NANOBANANA_INCOMING_URI`:
each run lists the location and pays only for images the archive's ledger does not
hold yet (a replaced image, same name, new bytes, is a new edit), so an hour with
nothing new submits nothing.
"""

from prefect_nanobanana.flows import batch_edit

__all__ = ["batch_edit"]

if __name__ == "__main__":
    import asyncio
    import sys

    images_uri, prompt, archive_uri = sys.argv[1:4]
    print(asyncio.run(batch_edit(images_uri=images_uri, prompt=prompt, archive_uri=archive_uri)))
