"""Users (admin): accounts and their roles; add, disable, re-enable, change role, reset a password."""

import pandas as pd
import streamlit as st

from dashboard import access, auth, state
from data import sessions, users

user = auth.require_page("users")
st.title("Users")
st.caption("Accounts live in the lab store beside the audit log; passwords are stored only as bcrypt hashes. Every "
           "change here is audited. The command line does the same: `labtrend users ...`.")

store = state.get_store(state.db_path())
actor = users.Actor(user.username, user.roles, {"via": "dashboard"})
policy = sessions.SessionPolicy.from_settings()
live = sessions.open_sessions(store, policy=policy, now=sessions.utcnow())
accounts = users.list_users(store)
table = pd.DataFrame(accounts, columns=["username", "name", "roles", "status", "must_change_password", "created_at",
                                        "last_login_at"])
table["open_sessions"] = table["username"].map(live).fillna(0).astype(int)
table["roles"] = table["roles"].map(", ".join)
st.dataframe(table, hide_index=True, width="stretch", key="users_table", column_config={
    "username": "Username", "name": "Name", "roles": "Role", "status": "Status",
    "must_change_password": st.column_config.CheckboxColumn("Must change password"),
    "created_at": st.column_config.DatetimeColumn("Created (UTC)", format="YYYY-MM-DD HH:mm"),
    "last_login_at": st.column_config.DatetimeColumn("Last sign-in (UTC)", format="YYYY-MM-DD HH:mm"),
    "open_sessions": st.column_config.NumberColumn("Open sessions"),
})

notice = st.session_state.pop("users_notice", None)
if notice:
    st.success(notice[0], icon=":material/check_circle:")
    if notice[1]:
        st.code(notice[1], language=None)
        st.caption("Give this temporary password to the person in person or by phone; it is shown only once, and "
                   "they must choose their own at the next sign-in.")


def _done(message: str, secret: str | None = None) -> None:
    st.session_state["users_notice"] = (message, secret)
    st.rerun()


left, right = st.columns(2, gap="large")
with left.container(border=True, key="users_manage"):
    st.subheader("Change an account")
    names = [a["username"] for a in accounts]
    who = st.selectbox("Account", names, index=None, placeholder="Choose an account", key="users_who")
    target = next((a for a in accounts if a["username"] == who), None)
    if target is not None:
        st.caption(f"{target['name']} · {', '.join(target['roles'])} · {target['status']}"
                   + (f" · {live.get(who, 0)} open session(s)" if live.get(who) else ""))
        c1, c2 = st.columns([2, 1], vertical_alignment="bottom")
        current = target["roles"][0] if target["roles"] else access.ROLES[0]
        role = c1.selectbox("Role", access.ROLES, index=access.ROLES.index(current), key="users_role")
        try:
            if c2.button("Change role", key="users_set_role", disabled=role in target["roles"]):
                users.set_role(store, who, role, by=actor)
                _done(f"{who} is now {role}; it applies at their next click.")
            c3, c4 = st.columns(2)
            if target["status"] == "active":
                if c3.button("Disable", key="users_disable", icon=":material/block:",
                             help="The account can no longer sign in; its open sessions end now."):
                    ended = users.disable_user(store, who, by=actor)
                    _done(f"{who} is disabled; {ended} open session(s) ended.")
            elif c3.button("Re-enable", key="users_enable", icon=":material/check_circle:"):
                users.enable_user(store, who, by=actor)
                _done(f"{who} can sign in again.")
            if c4.button("Reset password", key="users_reset", icon=":material/key:",
                         help="A temporary password, to be changed at the next sign-in; open sessions end."):
                temporary = users.reset_password(store, who, by=actor)
                _done(f"The password of {who} was reset; their open sessions ended.", temporary)
        except users.UserError as exc:
            st.error(str(exc))

with right.form("users_add", clear_on_submit=True, border=True):
    st.subheader("Add a user")
    c1, c2 = st.columns(2)
    username = c1.text_input("Username")
    name = c2.text_input("Full name")
    role = c1.selectbox("Role", access.ROLES)
    c1, c2 = st.columns(2)
    p1 = c1.text_input("Password", type="password", help=f"At least {access.MIN_PASSWORD_LENGTH} characters")
    p2 = c2.text_input("Repeat password", type="password")
    if st.form_submit_button("Add user", type="primary"):
        if p1 != p2:
            st.error("The passwords differ.")
        else:
            try:
                added = users.add_user(store, username, name, role, p1, by=actor)
            except users.UserError as exc:
                st.error(str(exc))
            else:
                _done(f"Added {added.username} ({role}).")
