"""Pretraining: mesh and shardings, the MatFormer objective, the jitted train step,
Orbax checkpoints, metrics, and the trainer loop. TensorFlow-free except through
`matlm.data`, which the trainer loop imports for batches."""
