"""The whole-head atlas composed once from installed templates (pydeface's head, nilearn's
MNI152 brain and tissue maps): what defacing, QC and volumetry place on a subject, and what the
synthetic cohort is drawn from; and a second head model from Colin27 (``colin``), one person's
head apart from that atlas, for synthetic heads that do not flatter the methods."""
