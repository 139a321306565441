"""Writing the merged model: tensors, index, config, tokenizer, model card; atomically."""
