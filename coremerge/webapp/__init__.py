"""The Gradio app's handlers and rendering; app.py only wires them to components."""
