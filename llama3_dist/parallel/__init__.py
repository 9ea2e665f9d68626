"""Process groups, collectives and the tensor-/pipeline-parallel layers built on them."""
