"""memaudit.report"""
