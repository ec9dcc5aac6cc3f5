"""The training configs shipped with medldm (package data: `medldm train --config brain_mri` finds them by name)."""
