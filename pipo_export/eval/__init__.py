"""`pipo-export eval`: perplexity, KL against a reference and the confidence gate of an export,
teacher forced on a text through the export's own graphs (see pipo_export.eval.run)."""
