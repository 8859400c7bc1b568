"""Fine-tuning: one generic engine; augmentations, batch mixing, optimizer groups and LR schedules as small parts."""
