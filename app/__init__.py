"""The Streamlit app over collections (``streamlit run app/main.py``); torch-free by design."""
