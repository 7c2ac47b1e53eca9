"""memaudit.embedders"""
