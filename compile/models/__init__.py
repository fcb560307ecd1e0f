"""Model families: how to build, load and cut a Hugging Face model of one architecture into exportable components."""
