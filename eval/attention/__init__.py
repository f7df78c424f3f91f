"""eval_attention and visualize_attention: the attention Jaccard against object masks, attention
pictures and videos."""
