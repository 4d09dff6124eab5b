"""Entry point of the on-demand deployment: one edit, triggered from the Prefect UI form.

A deployment entry point (see `deployments/prefect.yaml`); the flow itself lives in the
package, `prefect_nanobanana/flows/`.

The form shows the prompt as text, the images as a list and the enums as drop-downs.
"""

from prefect_nanobanana.flows import edit_and_archive

__all__ = ["edit_and_archive"]

if __name__ == "__main__":
    import sys

    print(edit_and_archive(prompt=sys.argv[1], images=sys.argv[2:]))
