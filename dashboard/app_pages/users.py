"""Users (admin): who has which role; add an account."""

import streamlit as st

from dashboard import access, auth

user = auth.require_page("users")
st.title("Users")
st.caption(f"Accounts live in the users file on the server (`{access.users_path().name}`, mode 0600); passwords are "
           "stored only as bcrypt hashes. The command line does the same: `labtrend users add`.")

st.dataframe(access.list_users(), hide_index=True, width="stretch", key="users_table")

with st.form("users_add", clear_on_submit=True):
    st.subheader("Add a user")
    c1, c2, c3 = st.columns(3)
    username = c1.text_input("Username")
    name = c2.text_input("Full name")
    role = c3.selectbox("Role", access.ROLES)
    p1 = c1.text_input("Password", type="password", help=f"At least {access.MIN_PASSWORD_LENGTH} characters")
    p2 = c2.text_input("Repeat password", type="password")
    if st.form_submit_button("Add user", type="primary"):
        if p1 != p2:
            st.error("The passwords differ.")
        else:
            try:
                access.add_user(username, name, role, p1)
            except access.UserError as exc:
                st.error(str(exc))
            else:
                auth.record("user_add", detail={"username": username.strip().lower(), "role": role})
                st.success(f"Added {username.strip().lower()} ({role}).")
